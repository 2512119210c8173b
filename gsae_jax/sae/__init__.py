"""SAE math: the Heaviside gate, architectures, losses and the decoder constraint."""
