"""Frontalisers' inference code: the GAN (encoder, decoder, pose head; ``model.py``) and the
warp-only baseline (a 3D mean face and a weak-perspective pose, no learning; ``warp.py``, built
on ``mesh.py``, ``weak_pose.py`` and ``raster.py``)."""
