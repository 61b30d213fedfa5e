"""kiln's benchmarks: `make bench` runs them and prints ratios against references
measured in the same run (these machines are noisy; absolute numbers are not)."""
