"""Faces in images: RetinaFace detection, five-point alignment, yaw and pose framing."""
