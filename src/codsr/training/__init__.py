"""Training code for CODSR (docs/method.md#stage-1 and #stage-2): losses, discriminator, trainers."""
