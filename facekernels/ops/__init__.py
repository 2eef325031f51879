"""Python wrappers of the compiled ops in facekernels._C (loaded lazily, see facekernels._extension)."""
