"""Storage commitment requester's listening side only: waits for one
N-EVENT-REPORT on a new association (PS3.4 J.3.3), with pynetdicom.

usage: commit_report_listener.py LISTEN_PORT AE_TITLE TIMEOUT_S [--refuse-scp-role]
First prints "listening on PORT" (LISTEN_PORT 0: a free port is chosen),
then, when the report came or the time is up, one line of JSON:
(--refuse-scp-role: the commitment context is accepted, but not the center's
SCP role on it, so the center may not send the report.)
{"action_status": -1, "event_type": int, "transaction_uid": str,
"committed": [...], "failed": {...}} (event_type -1 when none came).
"""
import json
import sys
import threading

from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

listen_port, title, timeout = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
refuse_role = "--refuse-scp-role" in sys.argv[4:]
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


ae = AE(ae_title=title)
if refuse_role:
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=False)
else:
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
server = ae.start_server(("127.0.0.1", listen_port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
print(f"listening on {server.server_address[1]}", flush=True)
got = done.wait(timeout=timeout)
server.shutdown()
print(json.dumps({
    "action_status": -1,
    "event_type": report.get("event_type", -1) if got else -1,
    "transaction_uid": report.get("transaction_uid", ""),
    "committed": report.get("committed", []),
    "failed": report.get("failed", {}),
}))
