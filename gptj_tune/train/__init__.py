"""Training: the loop (loop.py) and what it runs: the step's loss (step.py), the optimizer (optim.py),
checkpoints, the engines (engines.py) and their launch (launch.py), stop signals, host memory.

Kept free of imports: `gptj-tune run` on a multi-process recipe imports only train/launch.py."""
