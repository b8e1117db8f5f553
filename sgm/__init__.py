"""Samplers and denoisers in the style of Stability AI's generative-models ("sgm")."""
