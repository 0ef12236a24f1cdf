"""Privacy an admin switches on per job or per site: sample-level DP-SGD (Opacus), client-level
Gaussian DP, and homomorphic-encrypted aggregation (TenSEAL)."""
