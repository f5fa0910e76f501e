"""SCSI primary commands (SPC-4) shared by every device the appliance presents.

Pure code: no sockets, threads, time or sqlite. iSCSI hands a :class:`ScsiCommand` to a
:class:`~vtl.scsi.lu.LogicalUnit` and gets back a :class:`ScsiResult`.
"""

from vtl.scsi.command import ScsiCommand, ScsiResult, ScsiStatus

__all__ = ["ScsiCommand", "ScsiResult", "ScsiStatus"]
