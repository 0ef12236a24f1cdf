"""FLARE side of privacy: the site filters (client-level DP, HE encrypt/decrypt) FLARE runs on task data and results."""
