"""Device benchmarks: Sparrow side by side with llama.cpp, close to the machine's bandwidth limit."""
