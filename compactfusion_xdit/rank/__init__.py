"""What each torchrun rank runs: the worker (``xfuser``), the drop-in runner (``cfx-xdit``),
request lists and output files."""
