"""Storage Commitment SCU with pynetdicom (a client we did not write).

usage: commit_scu.py PORT CALLING_AE CLASS_UID:INSTANCE_UID...
Sends one N-ACTION (Request Storage Commitment), waits for the
N-EVENT-REPORT on the same association and prints it as JSON:
{"action_status": int, "event_type": int, "transaction_uid_matches": bool,
 "committed": [instance UIDs], "failed": {instance UID: reason}}
"""
import json
import sys
import threading

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

port, calling = int(sys.argv[1]), sys.argv[2]
refs = [arg.split(":", 1) for arg in sys.argv[3:]]
done = threading.Event()
report = {}


def on_report(event):
    ds = event.event_information
    report["event_type"] = event.event_type
    report["transaction_uid"] = str(ds.TransactionUID)
    report["committed"] = [str(i.ReferencedSOPInstanceUID) for i in ds.get("ReferencedSOPSequence", [])]
    report["failed"] = {str(i.ReferencedSOPInstanceUID): int(i.FailureReason) for i in ds.get("FailedSOPSequence", [])}
    done.set()
    return 0x0000, None


ae = AE(ae_title=calling)
ae.add_requested_context(StorageCommitmentPushModel)
assoc = ae.associate("127.0.0.1", port, ae_title="COUNTYPACS", evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
if not assoc.is_established:
    print(json.dumps({"error": "association failed"}))
    sys.exit(2)
request = Dataset()
request.TransactionUID = generate_uid()
request.ReferencedSOPSequence = []
for sop_class, sop_instance in refs:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    request.ReferencedSOPSequence.append(item)
status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
got_report = done.wait(timeout=20)
assoc.release()
print(json.dumps({
    "action_status": int(status.Status) if status else -1,
    "event_type": report.get("event_type", -1) if got_report else -1,
    "transaction_uid_matches": report.get("transaction_uid") == str(request.TransactionUID),
    "committed": report.get("committed", []),
    "failed": report.get("failed", {}),
}))
