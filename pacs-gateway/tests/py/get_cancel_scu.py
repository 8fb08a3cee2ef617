"""C-GET cancelled after its first sub-operation, then a second C-GET on the
same association (pynetdicom). Prints JSON with both final statuses and the
second one's completed count.

usage: get_cancel_scu.py PORT CALLING_AE STUDY_UID
"""
import json
import sys

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet as GET

port, calling, study = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ae = AE(ae_title=calling)
ae.add_requested_context(GET)
ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
assoc = ae.associate("127.0.0.1", port, ae_title="COUNTYPACS",
                     ext_neg=[build_role(CTImageStorage, scp_role=True)],
                     evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
assert assoc.is_established, "association failed"
query = Dataset()
query.QueryRetrieveLevel = "STUDY"
query.StudyInstanceUID = study
finals = []
for run in range(2):
    final = None
    for status, _ in assoc.send_c_get(query, GET, msg_id=11 + run):
        code = int(status.Status) if status else -1
        if code in (0xFF00, 0xFF01):
            if run == 0:
                cx = assoc._get_valid_context(GET, "", "scu")
                assoc.send_c_cancel(11, cx.context_id)
        else:
            final = status
    finals.append(final)
assoc.release()
print(json.dumps({
    "first": int(finals[0].Status),
    "second": int(finals[1].Status),
    "second_completed": int(finals[1].get("NumberOfCompletedSuboperations", -1)),
}))
