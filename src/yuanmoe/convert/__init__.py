from .official import (CheckpointError, config_from_official, config_to_official, native_to_official,
                       official_to_native)

__all__ = ["CheckpointError", "config_from_official", "config_to_official", "native_to_official",
           "official_to_native"]
