"""An example loracl plugin: the `l2_anchor` method (`spec` declares it, torch-free; `method` has
its implementation)."""
