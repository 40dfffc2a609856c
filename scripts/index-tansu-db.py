"""Adds refold's index to a tansu sqlite store (see index_tansu_db in services.sh).

Usage: python3 scripts/index-tansu-db.py PATH/tansu.db
Waits (up to 10 s) for the broker to create its `header` table, then indexes it.
"""
import sqlite3
import sys
import time

db = sqlite3.connect(sys.argv[1], timeout=30)
for _ in range(100):
    if db.execute("select 1 from sqlite_master where type = 'table' and name = 'header'").fetchone():
        break
    time.sleep(0.1)
else:
    sys.exit("tansu did not create its header table")
db.execute("create index if not exists refold_header_topition_offset on header (topition, offset_id)")
db.commit()
