from persllm_jax.cli import main

main(prog_name="persllm")
