"""Decode-attention benchmark (XLA path, and the Pallas kernel on a GPU or TPU): see `pallas_kernels/benchmark.py`.

python scripts/bench_kernels.py --help
"""

from pallas_kernels.benchmark import main

if __name__ == "__main__":
    main()
