"""C-FIND SCU with pynetdicom (a client we did not write).

usage: find_scu.py PORT CALLING_AE CHARSET NAME_PATTERN [cancel_after]
Queries Study Root, STUDY level, PatientName=NAME_PATTERN encoded in
CHARSET (e.g. GB18030), and prints JSON: {"statuses": [...], "names": [...]}.
With cancel_after=N, sends C-CANCEL after N pending responses.
"""
import json
import sys

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

port, calling, charset, pattern = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
cancel_after = int(sys.argv[5]) if len(sys.argv) > 5 else None

ae = AE(ae_title=calling)
ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
assoc = ae.associate("127.0.0.1", port, ae_title="COUNTYPACS")
assert assoc.is_established, "association failed"
ds = Dataset()
ds.SpecificCharacterSet = charset
ds.QueryRetrieveLevel = "STUDY"
ds.PatientName = pattern
ds.StudyInstanceUID = ""
statuses, names = [], []
responses = assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind, msg_id=7)
pending = 0
for status, identifier in responses:
    statuses.append(int(status.Status))
    if identifier is not None:
        names.append(str(identifier.PatientName))
        pending += 1
        if cancel_after is not None and pending == cancel_after:
            cx = assoc._get_valid_context(StudyRootQueryRetrieveInformationModelFind, "", "scu")
            assoc.send_c_cancel(7, cx.context_id)
assoc.release()
print(json.dumps({"statuses": statuses, "names": names}, ensure_ascii=False))
