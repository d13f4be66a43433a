"""Routing: what each router chose (captured from the router modules), the balance losses that keep
experts evenly loaded, and label-guided routing."""
