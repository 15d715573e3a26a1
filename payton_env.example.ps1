# Example user environment for Start_AI_Training.ps1. Copy it to payton_env.ps1 (which git
# ignores) and edit: the launcher sources that file before it starts training.

# Which GPUs this run may use.
# $env:CUDA_VISIBLE_DEVICES = "0"

# Where your dataset lives, passed to the trainer as an override.
# $Set += "data.root=D:\datasets\booru"

# Faster CUDA memory handling for long runs with varying shapes.
$env:PYTORCH_CUDA_ALLOC_CONF = "expandable_segments:True"

# Keep each DataLoader worker to one math thread.
$env:OMP_NUM_THREADS = "1"
