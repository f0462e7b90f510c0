"""Training code for CODSR (SPEC §8 stage 1 and §9 stage 2): losses, discriminator, trainers."""
