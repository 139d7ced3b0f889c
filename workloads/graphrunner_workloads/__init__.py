"""What is built on graphrunner through its public API, and never imported by it: a Llama-style decoder and its
attention backends, speculative decoding, the common runner to compare with, the hazard and co-tenant
demos, and the benchmarks (`python -m graphrunner_workloads.bench`, `... .spec_bench`)."""
