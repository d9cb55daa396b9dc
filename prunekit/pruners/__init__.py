"""Built-in pruning criteria and the registry that discovers every pruner (built-in or plugin)
through entry points. Imports the layers from calibrate down."""
