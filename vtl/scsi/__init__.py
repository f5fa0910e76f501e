"""SCSI primary commands (SPC-4) shared by every device the appliance presents.

Pure code: no sockets, threads, time or sqlite. iSCSI hands a :class:`ScsiCommand` to a
:class:`~vtl.scsi.target.ScsiTarget` (a LUN map of :class:`~vtl.scsi.lu.LogicalUnit`) and gets
back a :class:`ScsiResult`. Devices subclass :class:`~vtl.scsi.spc.SpcDevice`.
"""

from vtl.scsi.command import ScsiCommand, ScsiResult, ScsiStatus
from vtl.scsi.lu import LogicalUnit, Request, command
from vtl.scsi.modepages import BlockDescriptor, DescriptorFormat, ModePage
from vtl.scsi.sense import Asc, FieldPointer, SenseError, SenseKey, illegal_request
from vtl.scsi.spc import SpcDevice
from vtl.scsi.target import ScsiTarget

__all__ = [
    "Asc",
    "BlockDescriptor",
    "DescriptorFormat",
    "FieldPointer",
    "LogicalUnit",
    "ModePage",
    "Request",
    "ScsiCommand",
    "ScsiResult",
    "ScsiStatus",
    "ScsiTarget",
    "SenseError",
    "SenseKey",
    "SpcDevice",
    "command",
    "illegal_request",
]
