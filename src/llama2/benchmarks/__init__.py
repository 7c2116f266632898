"""Benchmarks behind `llama2 bench ACTION`: each module has add_arguments(parser) and run(args, io)."""
