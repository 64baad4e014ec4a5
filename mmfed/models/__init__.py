"""Image and text encoders into the shared latent space, task heads, and the client/global model."""
