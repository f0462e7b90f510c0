"""The CODSR generator: base SD 2.1 components, LoRA layout, RGPA, LQFM and checkpoints."""
