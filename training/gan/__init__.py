"""Pose-invariant face frontalisation (DR-GAN / CR-GAN family): networks, losses, recipe."""
