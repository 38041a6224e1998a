"""Tools on top of the optimizer and the training layer: `cli`, `verify`, `bench`,
`comm_counter`."""
