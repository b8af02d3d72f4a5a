# Set-up and checks. `make install` creates .venv in the repository root with the runtime (and
# matplotlib for plots); `make install-train` adds the training extra; `make test` installs
# everything and runs the suite; `make demo` runs the node on a rendered clip and scores it.
# `make install-ros` adds ROS 2 Jazzy (rclpy, messages, rosidl tools) and builds vision_msgs into
# .venv; `make test-ros` runs the ROS tests on real rclpy, where a missing rclpy fails them.
# Each reuses .venv when it already exists. Activate it afterwards: `. .venv/bin/activate`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install install-train install-ros test test-ros demo lint clean

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[plot]"
	touch $@

$(VENV)/.full: $(VENV)/.runtime pyproject.toml
	$(PY) -m pip install -e ".[train,dev]"
	touch $@

# vision_msgs is generated from the definitions in node/publish/ros_msgs.py.
$(VENV)/.ros: $(VENV)/.runtime pyproject.toml ros/build_vision_msgs.py ros/vision_msgs/CMakeLists.txt ros/vision_msgs/package.xml node/publish/ros_msgs.py
	$(PY) -m pip install -e ".[ros]"
	$(PY) ros/build_vision_msgs.py
	touch $@

install: $(VENV)/.runtime

install-train: $(VENV)/.full

install-ros: $(VENV)/.ros

test: $(VENV)/.full
	$(PY) -m pytest -q

ROS_TESTS := tests/node/test_ros2_live.py tests/node/test_ros2.py tests/test_launch.py

test-ros: $(VENV)/.full $(VENV)/.ros
	CONE_NODE_REQUIRE_ROS=1 $(PY) -m pytest -q $(ROS_TESTS)

demo: $(VENV)/.runtime
	$(PY) -m node demo --out runs/demo

lint: $(VENV)/.full
	$(PY) -m ruff check node export calib tests

clean:
	rm -rf runs build *.egg-info
