"""The run machinery, one layer below the method files.

The top-level modules (ddt.py, idft.py, hinted_decode.py, train.py, eval.py) hold the paper's
math and the loops a reader follows. What keeps a run safe and parallel lives here, one job per
module, and never imports a top-level module:

    cli.py          UserError, argparse with checked number types, one-line errors, exit codes
    files.py        atomic writes, append-only JSONL logs, output locks, input and output checks
    ranks.py        torchrun processes: sharding examples over ranks, gathering in input order,
                    DDP / FSDP wrapping, per-example seeds
    records.py      examples -> records, sharded over ranks, appended and resumable, merged in
                    input order (hinted_decode.py, eval.py, ddt.py)
    checkpoints.py  train.py's run directory: checkpoints (the sharded training state, the
                    exported model), resume identity, settings
    metrics.py      train.py's metrics.jsonl and its plot
    precision.py    the default dtype per device (bfloat16 on CUDA, float32 on CPU) and TF32
    report.py       the figures and tables of the reports, and the versions behind them
"""
