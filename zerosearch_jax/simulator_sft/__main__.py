"""`python -m zerosearch_jax.simulator_sft --config=configs/simulator_sft.py --workdir=...`"""

from zerosearch_jax.simulator_sft.pipeline import main

if __name__ == "__main__":
    main()
