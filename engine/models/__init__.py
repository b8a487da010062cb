"""Networks: the Wan transformer, its VAE and tiny decoder, the text encoder, VACE."""
