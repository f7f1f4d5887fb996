"""The GAN frontaliser's inference model: encoder, decoder and pose head, and how to run them."""
