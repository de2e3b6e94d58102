"""The Qt binding keeps Python's reference counts: PySide6-Essentials 6.12.0 dropped a reference
to True on every signal emit and to None on every void call, so the app aborted ("Fatal Python
error: bool_dealloc") after a few thousand mouse moves over an image. Run in a fresh process: a
binding with that fault would take the test session down with it."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import os, sys
os.environ["QT_QPA_PLATFORM"] = "offscreen"
import numpy as np
from PySide6.QtCore import QEvent, QPointF, Qt
from PySide6.QtGui import QMouseEvent
from PySide6.QtWidgets import QApplication, QLabel
from desktop.viewer import ImageViewerWidget

app = QApplication([])
viewer = ImageViewerWidget()
readout = QLabel()
viewer.cursor_moved.connect(lambda x, y: readout.setText(f"{x}, {y}"))
viewer.resize(400, 500)
viewer.show()
viewer.set_image(np.tile(np.linspace(0, 1, 300, dtype=np.float32), (400, 1)))
app.processEvents()

def move(i):
    pos = QPointF(50 + i % 200, 60 + i % 300)
    event = QMouseEvent(QEvent.Type.MouseMove, pos, viewer.viewport().mapToGlobal(pos),
                        Qt.MouseButton.NoButton, Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(viewer.viewport(), event)

for i in range(50):  # caches warm up
    move(i)
before = sys.getrefcount(True), sys.getrefcount(None)
for i in range(2000):
    move(i)
after = sys.getrefcount(True), sys.getrefcount(None)
assert readout.text(), "the cursor readout never updated"
print(before[0] - after[0], before[1] - after[1])
"""


def test_mouse_moves_over_an_image_keep_true_and_none_alive():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
    lost_true, lost_none = (int(v) for v in done.stdout.split())
    # 2000 moves: a leaking binding loses about one reference per move; a sound one none
    assert lost_true < 20 and lost_none < 20, (lost_true, lost_none)
