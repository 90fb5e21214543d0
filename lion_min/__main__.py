"""The command line: `python -m lion_min COMMAND [--key=value ...]`.

    python -m lion_min sft --model=DIR --data=FILE       # as python train_sft.py, lion-sft
    python -m lion_min dpo --model=DIR --data=FILE       # as python train_dpo.py, lion-dpo
    python -m lion_min online --model=DIR --prompts=FILE --judge=RULE_OR_DIR
    python -m lion_min sample --model=DIR --prompt=TEXT  # completions from a checkpoint
    python -m lion_min prepare sft|dpo --model=DIR --data=FILE   # fill the data cache ahead of a run
    python -m lion_min golden [compare EXPECTED ACTUAL]  # golden numbers: make them, or compare two sets
    python -m lion_min plot --sft=DIR --dpo=DIR --online=DIR --out=FILE
    python -m lion_min experiments NAME                  # docs/experiments.md
    python -m lion_min pairrm convert SRC OUT            # docs/pairrm.md
    python -m lion_min tiny --family=llama3 --tokenizer=DIR --out=DIR   # a random checkpoint to try the recipe on

`python -m lion_min COMMAND --help` lists a command's flags. Flags are parsed and checked before torch
is imported: each command imports what runs it once its flags are known.
"""

import sys

from lion_min import cli

COMMANDS = {
    "sft": lambda argv: cli.console(cli.sft_main, "python -m lion_min sft", argv),
    "dpo": lambda argv: cli.console(cli.dpo_main, "python -m lion_min dpo", argv),
    "online": lambda argv: cli.console(cli.online_main, "python -m lion_min online", argv, "prompts",
                                       " --judge=RULE_OR_DIR"),
    "sample": lambda argv: cli.run_cli(lambda: cli.sample_main(argv)),
    "prepare": lambda argv: cli.run_cli(lambda: cli.prepare_main(argv)),
    "golden": lambda argv: cli.run_cli(lambda: sys.exit(cli.golden_main(argv))),
    "plot": lambda argv: cli.run_cli(lambda: cli.plot_main(argv)),
    "experiments": lambda argv: cli.run_cli(lambda: cli.experiments_main(argv)),
    "pairrm": cli.pairrm_main,
    "tiny": lambda argv: cli.run_cli(lambda: sys.exit(cli.tiny_main(argv))),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        first = __doc__.split("\n\n")[1]
        print(f"usage: python -m lion_min COMMAND [flags]; the commands:\n\n{first}", file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r} (expected one of: {', '.join(COMMANDS)})", file=sys.stderr)
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
