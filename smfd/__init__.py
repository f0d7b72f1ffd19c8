"""smfd: sparse memory finetuning daemon.

A document travels source -> journal/spool -> chunker -> surprise scorer ->
slot selector -> sparse updater -> checkpoint -> probes -> metrics.
"""

__version__ = "0.1.0"
