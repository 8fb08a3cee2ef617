"""C-MOVE SCU with pynetdicom (a client we did not write).

usage: move_scu.py PORT CALLING_AE DESTINATION STUDY_UID [cancel_after]
Moves a study (Study Root, STUDY level) to DESTINATION and prints JSON with
every response: {"responses": [[status, remaining, completed, failed,
warning], ...]} (-1 for a count the response leaves out). With
cancel_after=N, sends C-CANCEL after N pending responses.
"""
import json
import sys

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

port, calling, dest, study = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
cancel_after = int(sys.argv[5]) if len(sys.argv) > 5 else None

ae = AE(ae_title=calling)
ae.add_requested_context(MOVE)
assoc = ae.associate("127.0.0.1", port, ae_title="COUNTYPACS")
assert assoc.is_established, "association failed"
query = Dataset()
query.QueryRetrieveLevel = "STUDY"
query.StudyInstanceUID = study
responses, pending = [], 0
for status, _ in assoc.send_c_move(query, dest, MOVE, msg_id=9):
    if not status:
        continue
    count = lambda name: int(status.get(name, -1)) if name in status else -1
    responses.append([
        int(status.Status),
        count("NumberOfRemainingSuboperations"),
        count("NumberOfCompletedSuboperations"),
        count("NumberOfFailedSuboperations"),
        count("NumberOfWarningSuboperations"),
    ])
    if int(status.Status) == 0xFF00:
        pending += 1
        if cancel_after is not None and pending == cancel_after:
            cx = assoc._get_valid_context(MOVE, "", "scu")
            assoc.send_c_cancel(9, cx.context_id)
assoc.release()
print(json.dumps({"responses": responses}))
