"""Storage commitment requester that releases at once and waits for the
report on a new association (PS3.4 J.3.3), with pynetdicom on both sides.

usage: commit_scu_release.py PORT CALLING_AE LISTEN_PORT CLASS_UID:INSTANCE_UID...
Prints JSON: {"action_status": int, "event_type": int, "committed": [...], "failed": {...}}
"""
import json
import sys
import threading

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

port, calling, listen_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
refs = [arg.split(":", 1) for arg in sys.argv[4:]]
done = threading.Event()
report = {}


def on_report(event):
    ds = event.event_information
    report["event_type"] = event.event_type
    report["committed"] = [str(i.ReferencedSOPInstanceUID) for i in ds.get("ReferencedSOPSequence", [])]
    report["failed"] = {str(i.ReferencedSOPInstanceUID): int(i.FailureReason) for i in ds.get("FailedSOPSequence", [])}
    done.set()
    return 0x0000, None


ae = AE(ae_title=calling)
ae.add_requested_context(StorageCommitmentPushModel)
# The center connects back as the commitment SCP to deliver the report.
ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
server = ae.start_server(("127.0.0.1", listen_port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
assoc = ae.associate("127.0.0.1", port, ae_title="COUNTYPACS")
assert assoc.is_established, "association failed"
request = Dataset()
request.TransactionUID = generate_uid()
request.ReferencedSOPSequence = []
for sop_class, sop_instance in refs:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    request.ReferencedSOPSequence.append(item)
status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
assoc.abort()  # gone before any report can come on this association
got = done.wait(timeout=30)
server.shutdown()
print(json.dumps({
    "action_status": int(status.Status) if status else -1,
    "event_type": report.get("event_type", -1) if got else -1,
    "committed": report.get("committed", []),
    "failed": report.get("failed", {}),
}))
