"""docs/multinode.md's commands, run as written on CPU with gloo: two "nodes" on localhost (two
torchrun agents meeting through the c10d rendezvous) give the weights of one process; data
prepared ahead is used as is; an --out_dir that one node does not see stops both at once; the
Slurm script runs under stand-ins for srun and scontrol (with the test's paths in its export line)."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_sft  # noqa: E402

DOC = ROOT / "docs" / "multinode.md"


def doc_command(name: str) -> str:
    """The fenced block of docs/multinode.md marked `# run by tests/test_multinode.py: NAME`."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    found = [b for b in blocks if f"# run by tests/test_multinode.py: {name}\n" in b]
    assert len(found) == 1, f"docs/multinode.md: no single block marked {name!r}"
    return "\n".join(line.strip() for line in found[0].splitlines())  # the block's indent inside a list


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tiny_chat_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    recipe = root / "tiny.toml"
    recipe.write_text(f'[shared]\nseed = 0\ndevice = "cpu"\n\n[sft]\nmodel = "{tiny_chat_model["model"]}"\n'
                      'seq_len = 96\nbatch_size = 4\nmicro_batch_size = 1\nmax_steps = 6\nlr = 1e-3\n'
                      'warmup_ratio = 0.0\nsave_every = 2\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RECIPE=str(recipe),
               DATA=str(tiny_chat_model["data"]), CACHE=str(root / "cache"), NNODES="2", NPROC="1",
               HEAD="127.0.0.1", JOB="multinode-test", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return root, env


def workers(job: str) -> dict[int, int]:
    """{RANK: pid} of the worker processes of the torchrun job named `job` (--rdzv_id)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            env = dict(x.split("=", 1) for x in (proc / "environ").read_bytes().decode().split("\0") if "=" in x)
        except (OSError, ValueError):  # not a process, or one that ended while we looked
            continue
        if env.get("TORCHELASTIC_RUN_ID") == job and "RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


def run_nodes(env: dict, outs: list[Path], timeout: int = 240, kill_after: str = "", kill_rank: int = 0
              ) -> list[subprocess.CompletedProcess]:
    """The doc's torchrun command on each "node" at once (node i writing to outs[i]); with
    `kill_after`, the worker of rank `kill_rank` is killed once outs[0]/kill_after exists."""
    cmd, port = doc_command("nodes"), str(free_port())
    procs = [subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, env=env | {"PORT": port, "OUT": str(out)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for out in outs]
    if kill_after:
        deadline = time.time() + timeout
        while not (outs[0] / kill_after).exists() and time.time() < deadline:
            time.sleep(0.02)
        os.kill(workers(env["JOB"])[kill_rank], signal.SIGKILL)
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, outputs)]


@pytest.mark.slow
def test_two_nodes_equal_one_process_with_data_prepared_ahead(setup):
    root, env = setup
    prepare = subprocess.run(["bash", "-c", doc_command("prepare")], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=240)
    assert prepare.returncode == 0, prepare.stderr[-3000:]
    prepared = sorted(p.name for p in (root / "cache").iterdir())
    assert len(prepared) == 1
    one = root / "one"  # the reference: one process, the same recipe and prepared data
    train_sft.main([f"--config={env['RECIPE']}", f"--data={env['DATA']}", f"--data_cache={env['CACHE']}",
                    f"--out_dir={one}"])
    out = root / "two_nodes"
    for res in run_nodes(env, [out, out]):
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert sorted(p.name for p in (root / "cache").iterdir()) == prepared  # the prepared data, as is
    a, b = load_file(str(one / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    rel = max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a)
    print(f"two localhost nodes vs one process: largest relative difference of a weight {rel:.1e}")
    assert rel < 1e-5  # float32 reduction order only
    start = load_file(str(Path(env["RECIPE"]).read_text().split('model = "')[1].split('"')[0]) + "/model.safetensors")
    assert not torch.equal(start["model.norm.weight"], b["model.norm.weight"])  # and it trained
    assert (out / "checkpoints" / "step_6").is_dir()


@pytest.mark.slow
def test_an_out_dir_one_node_does_not_see_stops_both_nodes(setup):
    root, env = setup
    env = env | {"CACHE": "off"}  # --data_cache=off: only the run folder is not shared here
    outs = [root / "node0_disk" / "run", root / "node1_disk" / "run"]  # as if each node had its own disk
    t0 = time.time()
    results = run_nodes(env, outs)
    took = time.time() - t0
    assert all(r.returncode != 0 for r in results)
    errors = [ln for r in results for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors and all("cannot see the folder rank 0 created there: with several nodes, --out_dir must be on a "
                          "file system every node shares" in ln for ln in errors), errors
    assert not any(out.exists() for out in outs)  # nothing left behind
    assert len(errors) == 4  # said once (by rank 0) at the first start and at each of torchrun's 3 restarts
    print(f"both nodes stopped after {took:.0f} s (torchrun's 3 restarts included)")


@pytest.mark.slow
def test_the_slurm_script_under_stand_ins_for_srun(setup, tmp_path):
    root, env = setup
    script = doc_command("slurm")
    exports = re.search(r"^export PORT=.*?(?<!\\)\n", script, re.S | re.M)
    assert exports, "the script's export line of site paths"
    out = root / "slurm"
    script = script.replace(exports.group(0), f"export PORT={free_port()} RECIPE={env['RECIPE']} DATA={env['DATA']} "
                                              f"OUT={out} CACHE=off\n")
    bin_dir = tmp_path / "bin"  # srun: one task per node of the allocation, all at once; scontrol: the nodes
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nfor i in $(seq 1 $SLURM_NNODES); do "$@" & done\n'
                                  'status=0; for job in $(jobs -p); do wait $job || status=1; done; exit $status\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho 127.0.0.1\necho 127.0.0.2\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    slurm = {"SLURM_JOB_NODELIST": "node[001-002]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1",
             "SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{env['PATH']}"}
    (tmp_path / "job.sh").write_text(script)
    res = subprocess.run(["bash", str(tmp_path / "job.sh")], cwd=ROOT, env=env | slurm, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and "batch          4 rows = 1 per micro-batch x 2 accumulated x " \
                                                      "2 rank(s)" in res.stdout


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc (Linux)")
def test_two_nodes_restart_together_after_a_worker_is_killed(setup):
    root, env = setup
    env = env | {"CACHE": "off", "JOB": "multinode-restart"}
    one = root / "one_again"
    train_sft.main([f"--config={env['RECIPE']}", f"--data={env['DATA']}", "--data_cache=off", f"--out_dir={one}"])
    out = root / "two_nodes_killed"
    results = run_nodes(env, [out, out], kill_after="checkpoints/step_2", kill_rank=1)
    for res in results:
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    printed = "".join(r.stdout for r in results)
    assert "training 6 steps from step 0" in printed and re.search(r"training 6 steps from step [2-5] \(resumed", printed)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(out / "model.safetensors"))
    rel = max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a)
    print(f"two localhost nodes, a worker killed and the job restarted, vs one process: {rel:.1e}")
    assert rel < 1e-5
