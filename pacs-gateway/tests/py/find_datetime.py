"""C-FIND SCU with pynetdicom (a client we did not write), asking for
combined date and time matching by extended negotiation (PS3.4 C.5.1.1).

usage: find_datetime.py PORT CALLING_AE DATE_RANGE TIME_RANGE combined|separate
Queries Study Root, STUDY level, StudyDate=DATE_RANGE and
StudyTime=TIME_RANGE; prints JSON: {"granted": <the acceptor's answer to
the negotiation, hex, or null>, "studies": [StudyInstanceUID...]}.
"""
import json
import sys

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

port, calling, dates, times, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]

ae = AE(ae_title=calling)
ae.add_requested_context(FIND)
ext_neg = []
if mode == "combined":
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid = FIND
    # Byte 1 relational queries: no; byte 2 combined date and time: yes.
    item.service_class_application_information = b"\x00\x01"
    ext_neg.append(item)
assoc = ae.associate("127.0.0.1", port, ae_title="COUNTYPACS", ext_neg=ext_neg)
assert assoc.is_established, "association failed"
granted = assoc.acceptor.sop_class_extended.get(FIND)
ds = Dataset()
ds.QueryRetrieveLevel = "STUDY"
ds.StudyDate = dates
ds.StudyTime = times
ds.StudyInstanceUID = ""
studies = []
for status, identifier in assoc.send_c_find(ds, FIND):
    if identifier is not None and status and int(status.Status) in (0xFF00, 0xFF01):
        studies.append(str(identifier.StudyInstanceUID))
assoc.release()
print(json.dumps({"granted": granted.hex() if granted else None, "studies": sorted(studies)}))
