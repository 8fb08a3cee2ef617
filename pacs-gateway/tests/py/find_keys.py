"""C-FIND SCU with pynetdicom (a client we did not write), any keys.

usage: find_keys.py PORT CALLING_AE LEVEL KEY=VALUE...
KEY is a keyword (StudyTime) or a tag with its VR (0009,1001:LO; an SQ
key is sent as an empty sequence); values are sent in UTF-8 (ISO_IR 192)
unless a SpecificCharacterSet=... key names another. Queries
Study Root at LEVEL, proposing pynetdicom's default transfer syntaxes
(implicit VR little endian first), and prints JSON:
{"statuses": [...], "rows": [{keyword or tag: value, ...}, ...]}.
"""
import json
import sys

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

port, calling, level = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ds = Dataset()
ds.SpecificCharacterSet = "ISO_IR 192"
ds.QueryRetrieveLevel = level
for spec in sys.argv[4:]:
    key, _, value = spec.partition("=")
    if ":" in key:
        tag, vr = key.split(":")
        group, element = (int(x, 16) for x in tag.strip("()").split(","))
        ds.add_new((group << 16) | element, vr, [] if vr == "SQ" else value)
    else:
        setattr(ds, key, value)
ae = AE(ae_title=calling)
ae.add_requested_context(FIND)
assoc = ae.associate("127.0.0.1", port, ae_title="COUNTYPACS")
assert assoc.is_established, "association failed"
statuses, rows = [], []
for status, identifier in assoc.send_c_find(ds, FIND):
    statuses.append(int(status.Status))
    if identifier is not None:
        row = {}
        for elem in identifier:
            name = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
            value = elem.value
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            row[name] = str(value).rstrip("\0 ")
        rows.append(row)
assoc.release()
print(json.dumps({"statuses": statuses, "rows": rows}, ensure_ascii=False))
