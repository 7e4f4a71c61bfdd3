"""The thesis benchmark suite behind ``secondorder bench``."""
