"""Reference operators this model uses, copied from archgen's templates/runtime. Do not edit."""
