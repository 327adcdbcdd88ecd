"""Per-layer bit-widths for a budget (decision 020): each layer's sensitivity
(:mod:`.sensitivity`), the allocation under a size / bits / BOPs budget (:mod:`.allocation`), and
the eval option that ties them to a backbone (:mod:`.autobit`). Bit configurations themselves
(``ssql_core.bitconfig``) are used everywhere bits are, so they stay outside."""
