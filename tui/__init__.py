"""The Apertus terminal chat app (Textual), one face of the `apertus_mlx` engine."""
