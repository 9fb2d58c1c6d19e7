# A stand-in for Vagrant, so that tests can evaluate vagrant/Vagrantfile without Vagrant: every
# configuration call is recorded, and the provisioners and machines are printed as JSON.
require "json"

class Recorder
  def initialize(path, log)
    @path = path
    @log = log
  end

  def method_missing(name, *args, **kw, &blk)
    @log << { "path" => (@path + [name]).map(&:to_s), "args" => args, "kw" => kw }
    child = Recorder.new(@path + [name], @log)
    blk&.call(child)
    child
  end

  def respond_to_missing?(*)
    true
  end
end

module Vagrant
  LOG = []

  def self.configure(_version)
    yield Recorder.new([], LOG)
  end
end

load ARGV.fetch(0)
machines = []
Vagrant::LOG.each do |call|
  case call["path"].last
  when "define"
    machines << { "name" => call["args"][0], "provisioners" => [], "ip" => nil }
  when "provision"
    machines.last["provisioners"] << call["kw"].merge("name" => call["args"][0])
  when "network"
    machines.last["ip"] = call["kw"][:ip] if machines.any?
  end
end
puts JSON.generate(machines)
