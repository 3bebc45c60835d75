"""rnnscope: look inside trained recurrent networks. The command line lives in ``rnnscope.cli``."""
__version__ = "0.1.0"
