"""The speed benchmark (paper Tables 6 and 8, done with a fast dense baseline): time to first token, pre-fill +
generation, routing, block swaps and peak memory, dense against pruned, both run by the same engine.

* timing.py: the clock and the timed runs (pre-fill and generation per set, routing, swaps, graphed calls);
* references.py: what the figures are put against in the same run (the matrix products alone, plain transformers)
  and kernel profiles of a step;
* memory.py: what the allocator holds at the engine's peak, part by part;
* suites.py: the benchmarks `pudding bench` runs (a shape with random weights, quantized or LoRA blocks, bundles);
* report.py: their JSON as Markdown, with the goals.

Each decode figure is also put against the memory-bandwidth ceiling: the HBM bandwidth measured in the same run (a
device-to-device copy, bytes read plus written) over the bytes of weights read per generated token (the blocks that
run, the final norm, the LM head).
"""
