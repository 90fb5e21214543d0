"""How often torchrun --max-restarts brings a 2-rank run back after a worker is killed.

    python bench/elastic_restarts.py
    python bench/elastic_restarts.py --tries=5 --kill_ranks=1,0 --share_store=true

Each try launches `torchrun --standalone --nproc_per_node=2 --max-restarts=1 train_sft.py ...
--save_every=2 --resume=auto` on a tiny random Llama (CPU, gloo), SIGKILLs the worker of one rank
once step_4 is written, and waits (--hang_s) for torchrun. A try passes when torchrun exits 0 with
an export whose weights equal those of an uninterrupted 2-rank run bit for bit. Prints one line per
try (exit status, seconds from the kill to the end, the failure's telltale) and the count.
--share_store=false launches with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_faults import worker_pids as workers  # noqa: E402  (torchrun's workers, found through /proc)

from lion_min.run.flags import parse_cli  # noqa: E402


@dataclass
class Config:
    tries: int = 5
    """Tries per killed rank."""
    kill_ranks: str = "1,0"
    share_store: bool = True
    """torchrun's default (the agent's TCPStore shared with the workers across restarts)."""
    hang_s: int = 150
    """A try still running this long after the kill counts as a hang (and is ended)."""
    work: str = ""
    """Folder for the model, data and runs (default: a new temporary folder)."""


def setup(work: Path) -> tuple[Path, Path]:
    from conftest import make_hf_checkpoint
    from tokenizers_for_tests import build_gemma_chatml_tokenizer

    model, data = work / "model", work / "chats.jsonl"
    make_hf_checkpoint("llama-3-8b", model, std=0.05, vocab_size=1024)
    build_gemma_chatml_tokenizer(model)
    config = json.loads((model / "config.json").read_text()) | {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    (model / "config.json").write_text(json.dumps(config))
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i % 7}?"},
                                                     {"role": "assistant", "content": f"{i + i % 7}."}]}) + "\n"
                            for i in range(48)))
    return model, data


def main(argv=None):
    cfg = parse_cli(Config, {}, argv, doc=__doc__)
    print("command: python bench/elastic_restarts.py " + " ".join(sys.argv[1:] if argv is None else argv))
    import torch

    print(f"torch {torch.__version__}, share_store={cfg.share_store}")
    from safetensors.torch import load_file

    work = Path(cfg.work or tempfile.mkdtemp(prefix="elastic_"))
    model, data = setup(work)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    if not cfg.share_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    def args(out: Path) -> list[str]:
        return [str(ROOT / "train_sft.py"), f"--model={model}", f"--data={data}", f"--out_dir={out}", "--seq_len=96",
                "--batch_size=4", "--micro_batch_size=1", "--max_steps=16", "--lr=1e-3", "--warmup_ratio=0.0",
                "--save_every=2", "--seed=0", "--device=cpu", "--resume=auto"]

    subprocess.run([*torchrun, *args(work / "full")], env=env, check=True, capture_output=True)
    full = load_file(str(work / "full" / "model.safetensors"))
    passed = total = 0
    for rank in map(int, cfg.kill_ranks.split(",")):
        for t in range(cfg.tries):
            out, log = work / f"rank{rank}_try{t}", work / f"rank{rank}_try{t}.log"
            with log.open("w") as f:
                proc = subprocess.Popen([*torchrun, "--max-restarts=1", *args(out)], stdout=f, stderr=subprocess.STDOUT,
                                        env=env)
                while not (out / "checkpoints" / "step_4").is_dir() and proc.poll() is None:
                    time.sleep(0.02)
                os.kill(workers(proc.pid)[rank], signal.SIGKILL)
                killed = time.time()
                try:
                    code = proc.wait(timeout=cfg.hang_s)
                except subprocess.TimeoutExpired:
                    for pid in workers(proc.pid).values():
                        os.kill(pid, signal.SIGKILL)
                    proc.kill()
                    proc.wait()
                    code = "hang"
            took = time.time() - killed
            text = log.read_text()
            ok = code == 0 and (out / "model.safetensors").is_file()
            if ok:
                got = load_file(str(out / "model.safetensors"))
                ok = all((got[k] == full[k]).all() for k in full)
            telltale = ", ".join(s for s in ("connectFullMesh", "Connection refused") if s in text)
            print(f"rank {rank} killed, try {t}: exit {code}, {took:.0f} s after the kill, "
                  f"{'identical weights' if ok else 'FAILED'} {telltale}", flush=True)
            passed, total = passed + ok, total + 1
    print(f"{passed}/{total} restarts finished with weights identical to the uninterrupted run")


if __name__ == "__main__":
    main()
