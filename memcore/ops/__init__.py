"""Backend dispatch and torch.library custom ops; the only package that touches ``memcore._C``."""
