"""The model core: configuration, the pure-function model over a parameter pytree, pytree
helpers and function transforms, compilation, devices and file reading. Knows nothing of
training, data or serving; every other subpackage builds on it."""
